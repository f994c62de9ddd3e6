//! The FUSE adapter: each callback translates its arguments, asks the
//! [`Model`], and turns the answer into a reply. No logic lives here.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::attr::Attr;
use super::error::FsError;
use super::inode::Kind;
use super::model::Model;

/// How long the kernel may keep a name without asking. Container
/// directories and their files never change while they live, and a vanished
/// container is invalidated at once, so their names are kept long: a script
/// polling a file costs open and read only. The `cgroup/` tree is not
/// followed by inotify, so its names expire quickly.
fn entry_ttl(attr: &Attr) -> Duration {
    if attr.lasting {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(1)
    }
}

/// How long the kernel may keep a node's attributes. A file's size is the
/// length of its text, which changes with its value, so every stat asks
/// (and the open right after serves what that stat measured). Nothing
/// reads a file's attributes on the way to an open here, as the kernel
/// checks no modes unless `--private` asks it to.
fn attr_ttl(attr: &Attr) -> Duration {
    match attr.kind {
        Kind::File => Duration::ZERO,
        Kind::Dir | Kind::Symlink => entry_ttl(attr),
    }
}

pub struct FuseFs {
    model: Arc<Model>,
    /// Shown as every node's times: the tree exists since the daemon started.
    started: SystemTime,
    uring: Uring,
}

/// Whether to take FUSE over io_uring when the kernel offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uring {
    Take,
    /// `--no-fuse-uring`.
    Refuse,
    /// A supervised server: the requests a ring holds when its server dies
    /// are neither resent nor ended by the kernel, so their readers would
    /// wait forever.
    Supervised,
}

impl FuseFs {
    pub fn new(model: Arc<Model>, uring: Uring) -> FuseFs {
        FuseFs {
            model,
            started: SystemTime::now(),
            uring,
        }
    }

    fn attr(&self, attr: Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(attr.ino),
            size: attr.size,
            blocks: attr.size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: file_type(attr.kind),
            perm: attr.perm,
            nlink: if attr.kind == Kind::Dir { 2 } else { 1 },
            uid: attr.uid,
            gid: attr.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn name(name: &OsStr) -> Result<&str, FsError> {
    // Every name in the tree is UTF-8, so others cannot exist.
    name.to_str().ok_or(FsError::NotFound)
}

/// Requests the kernel may have in flight in the background (the kernel's
/// default is 12). Every close is a background RELEASE, and a release that
/// waits for a slot keeps its snapshot alive in the daemon: with a dozen
/// slots, many busy readers queue releases faster than they are let
/// through, and the daemon's memory grows for as long as they read.
const MAX_BACKGROUND: u16 = 1024;

/// The largest request or reply over io_uring: every ring entry has a
/// buffer this size. Nothing is ever written to this filesystem, and reads
/// are at most 256 pages (the kernel's own cap) either way.
const URING_MAX_WRITE: u32 = 1 << 20;

/// Takes FUSE over io_uring if the kernel offers it (it does only with
/// `fuse.enable_uring=1`, Linux 6.14+) and this process may create rings;
/// a `supervised` server only says why it does not.
fn offer_uring(config: &mut KernelConfig, supervised: bool) {
    if !config
        .capabilities()
        .contains(InitFlags::FUSE_OVER_IO_URING)
    {
        log::info!("FUSE over io_uring: not offered by the kernel (fuse.enable_uring=0 or before Linux 6.14); using /dev/fuse");
        return;
    }
    if supervised {
        log::info!("FUSE over io_uring: offered, but not used by a supervised daemon (the requests a ring holds when its server dies would never be answered; --no-supervise takes it); using /dev/fuse");
        return;
    }
    if !fuser::runs_on_every_cpu() {
        log::info!("FUSE over io_uring: not used, as this daemon may not run on every CPU (taskset or cpuset) and would serve other CPUs' queues from afar; using /dev/fuse");
        return;
    }
    if !fuser::io_uring_usable() {
        log::warn!("FUSE over io_uring: offered, but this process cannot create an io_uring (kernel.io_uring_disabled?); using /dev/fuse");
        return;
    }
    if config.set_max_write(URING_MAX_WRITE).is_ok()
        && config
            .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
            .is_ok()
    {
        log::info!("FUSE over io_uring: requested");
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND / 4 * 3);
        if self.uring != Uring::Refuse {
            offer_uring(config, self.uring == Uring::Supervised);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, child: &OsStr, reply: ReplyEntry) {
        match name(child).and_then(|n| self.model.lookup(parent.0, n)) {
            Ok(attr) => reply.entry_with_ttls(
                &attr_ttl(&attr),
                &entry_ttl(&attr),
                &self.attr(attr),
                Generation(0),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        self.model.forget(ino.0);
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.model.readlink(ino.0, req.pid()) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.model.getattr(ino.0) {
            Ok(attr) => reply.attr(&attr_ttl(&attr), &self.attr(attr)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        match self.model.open(ino.0, write) {
            // Direct I/O: the page cache never serves an old value and the size
            // never truncates one. No flush: there is nothing to write back.
            Ok(handle) => reply.opened(
                FileHandle(handle),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NOFLUSH,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.model.read(ino.0, fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.model.release(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// No file here is a terminal or takes a command. Python's `open`
    /// asks (`isatty`, a TCGETS) every time, and the kernel does not
    /// remember an answer, so each is a request; ENOTTY is what the kernel
    /// would make of fuser's default ENOSYS, without fuser's warning for
    /// every Python read.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model.opendir(ino.0) {
            Ok(handle) => reply.opened(FileHandle(handle), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.model.readdir(ino.0, fh.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(e)),
        };
        // The cookie of an entry is the index of the one after it.
        for (index, entry) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(entry.ino),
                index as u64 + 1,
                file_type(entry.kind),
                &entry.name,
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.model.release(fh.0);
        reply.ok();
    }

    // The mount is read-only, so the kernel refuses these itself; answering
    // EROFS here as well keeps that true whatever the mount flags.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _t: &Path, reply: ReplyEntry) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(FsError::ReadOnly));
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(FsError::ReadOnly));
    }
}

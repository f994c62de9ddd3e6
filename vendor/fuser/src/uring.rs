//! cgmetric: FUSE over io_uring (Linux 6.14+, `fuse.enable_uring=1`).
//!
//! Over `/dev/fuse` every request goes to one queue, served by whichever
//! thread reads first, usually on another CPU than the requester: the
//! requester then sleeps and must be woken across CPUs, tens of
//! microseconds on a VM. Over io_uring the kernel keeps one queue per CPU and
//! puts a request on the queue of the CPU its task runs on. A thread per
//! queue, bound to that CPU, serves it there: the requester's CPU switches
//! to the server and back, as when both were pinned to one CPU.
//!
//! Each serving thread has its own ring with one entry registered in its
//! CPU's queue (the kernel hands a request to any free entry of the queue),
//! so a slow request holds only its own thread. An entry is a header buffer
//! (`fuse_in_header`, the operation's header, and the ring's own fields) and
//! a payload buffer. A request arrives as a completion; the reply is written
//! into the same buffers and handed back by COMMIT_AND_FETCH, which also
//! asks for the next request. Forgets, interrupts and notifications still
//! use `/dev/fuse`, so the classic threads keep running.
//!
//! The ABI is `include/uapi/linux/fuse.h` (`fuse_uring_req_header`,
//! `fuse_uring_cmd_req`); libfuse's `lib/fuse_uring.c` is the reference user.

use std::io;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use io_uring::IoUring;
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types;
use log::debug;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ll::fuse_abi::fuse_in_header;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: `in_out` (128 bytes: the in or out
/// header), `op_in` (128: the operation's own header), then
/// `fuse_uring_ent_in_out` (flags, commit_id, payload_sz, padding,
/// reserved).
const IN_OUT: usize = 0;
const OP_IN: usize = 128;
const OP_IN_SIZE: usize = 128;
const COMMIT_ID: usize = 256 + 8;
const PAYLOAD_SZ: usize = 256 + 16;
const HEADER_SIZE: usize = 256 + 32;
const IN_HEADER_SIZE: usize = size_of::<fuse_in_header>();
/// `struct fuse_out_header`: len, error, unique.
const OUT_HEADER_SIZE: usize = 16;

/// Serving threads per CPU queue: a request that waits (a rate's window, a
/// large aggregate) holds one; the other serves the rest of that CPU.
pub(crate) const THREADS_PER_QUEUE: usize = 2;

/// Whether this process can create the rings the FUSE transport needs
/// (io_uring may be disabled by `kernel.io_uring_disabled` or a seccomp
/// filter). Asked before FUSE_OVER_IO_URING is offered at INIT: once it
/// is agreed, the kernel holds every request until all queues register.
pub fn io_uring_usable() -> bool {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .build(2)
        .is_ok()
}

/// The CPUs of a kernel CPU list such as "0-3,8".
fn cpu_list(path: &str) -> io::Result<Vec<usize>> {
    let text = std::fs::read_to_string(path)?;
    let bad = || io::Error::other(format!("{path}: unexpected CPU list {text:?}"));
    let mut cpus = Vec::new();
    for range in text.trim().split(',').filter(|r| !r.is_empty()) {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let first: usize = first.parse().map_err(|_| bad())?;
        let last: usize = last.parse().map_err(|_| bad())?;
        cpus.extend(first..=last);
    }
    Ok(cpus)
}

/// The kernel's queue count: one per possible CPU.
pub(crate) fn queue_count() -> io::Result<usize> {
    Ok(cpu_list("/sys/devices/system/cpu/possible")?.len())
}

/// Whether this thread may run on every online CPU. A queue is served well
/// only from its own CPU: a daemon confined to some CPUs (taskset, cpuset)
/// would serve the others' queues across CPUs, without the spin that
/// /dev/fuse threads have, and be slower than over /dev/fuse.
pub fn runs_on_every_cpu() -> bool {
    let Ok(online) = cpu_list("/sys/devices/system/cpu/online") else {
        return false;
    };
    // SAFETY: a zeroed cpu_set_t is valid; the call writes only it.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) } != 0 {
        return false;
    }
    online
        .iter()
        // SAFETY: CPU_ISSET reads the set; the index is checked first.
        .all(|&cpu| cpu < libc::CPU_SETSIZE as usize && unsafe { libc::CPU_ISSET(cpu, &allowed) })
}

/// Memory the kernel reads and writes for one entry. Page-aligned, and
/// never moved while registered.
struct Buffers {
    header: *mut u8,
    payload: *mut u8,
    payload_len: usize,
}

// SAFETY: the buffers are plain memory; `Slot`'s mutex orders every access
// from user space, and the kernel touches them only between a submission
// and its completion, while user space does not.
unsafe impl Send for Buffers {}

impl Buffers {
    fn new(payload_len: usize) -> io::Result<Buffers> {
        let map = |len: usize| {
            // SAFETY: an anonymous private mapping; checked below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                Err(io::Error::last_os_error())
            } else {
                Ok(ptr.cast::<u8>())
            }
        };
        let header = map(page_size::get().max(HEADER_SIZE))?;
        let payload = match map(payload_len) {
            Ok(payload) => payload,
            Err(e) => {
                // SAFETY: mapped just above with this length.
                unsafe { libc::munmap(header.cast(), page_size::get().max(HEADER_SIZE)) };
                return Err(e);
            }
        };
        Ok(Buffers {
            header,
            payload,
            payload_len,
        })
    }

    fn header(&self) -> &[u8] {
        // SAFETY: mapped with at least HEADER_SIZE bytes; see `Send`.
        unsafe { std::slice::from_raw_parts(self.header, HEADER_SIZE) }
    }

    fn payload(&self) -> &[u8] {
        // SAFETY: mapped with payload_len bytes; see `Send`.
        unsafe { std::slice::from_raw_parts(self.payload, self.payload_len) }
    }

    /// Both buffers, writable: two separate mappings.
    fn parts_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        // SAFETY: as above; `&mut self` makes these the only references.
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.header, HEADER_SIZE),
                std::slice::from_raw_parts_mut(self.payload, self.payload_len),
            )
        }
    }

    fn read_u64(&self, at: usize) -> u64 {
        u64::from_ne_bytes(self.header()[at..at + 8].try_into().unwrap())
    }

    fn read_u32(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.header()[at..at + 4].try_into().unwrap())
    }

    fn write_u32(&mut self, at: usize, value: u32) {
        self.parts_mut().0[at..at + 4].copy_from_slice(&value.to_ne_bytes());
    }

    /// Writes a reply given as fuser's iovecs: the out header goes to
    /// `in_out`, the rest to the payload.
    fn write_reply(&mut self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let total: usize = data.iter().map(|d| d.len()).sum();
        let Some(payload_len) = total.checked_sub(OUT_HEADER_SIZE) else {
            return Err(io::Error::other("reply shorter than its header"));
        };
        if payload_len > self.payload_len {
            return Err(io::Error::other(format!(
                "reply of {payload_len} bytes exceeds the ring's {}",
                self.payload_len
            )));
        }
        let (header, payload) = self.parts_mut();
        let mut at = 0;
        for slice in data {
            let bytes: &[u8] = slice;
            // The first OUT_HEADER_SIZE bytes of the reply are its header.
            let head = OUT_HEADER_SIZE.saturating_sub(at).min(bytes.len());
            if head > 0 {
                header[IN_OUT + at..IN_OUT + at + head].copy_from_slice(&bytes[..head]);
            }
            if head < bytes.len() {
                let dest = at + head - OUT_HEADER_SIZE;
                payload[dest..dest + bytes.len() - head].copy_from_slice(&bytes[head..]);
            }
            at += bytes.len();
        }
        self.write_u32(PAYLOAD_SZ, payload_len as u32);
        Ok(())
    }

    /// An error reply for `unique`, when the filesystem sent none.
    fn write_error(&mut self, unique: u64, errno: i32) {
        let header = self.parts_mut().0;
        header[IN_OUT..IN_OUT + 4].copy_from_slice(&(OUT_HEADER_SIZE as u32).to_ne_bytes());
        header[IN_OUT + 4..IN_OUT + 8].copy_from_slice(&(-errno).to_ne_bytes());
        header[IN_OUT + 8..IN_OUT + 16].copy_from_slice(&unique.to_ne_bytes());
        self.write_u32(PAYLOAD_SZ, 0);
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: mapped in `new` with these lengths; the ring that
        // registered them is gone (it is dropped first, see `serve`).
        unsafe {
            libc::munmap(self.header.cast(), page_size::get().max(HEADER_SIZE));
            libc::munmap(self.payload.cast(), self.payload_len);
        }
    }
}

/// One entry's buffers, and whether a reply may still be written to them:
/// a reply that comes after the entry was committed (the filesystem kept
/// it past its callback) is dropped rather than written into the next
/// request.
struct SlotState {
    buffers: Buffers,
    open: bool,
    replied: bool,
}

/// Where a reply to a ring request goes.
#[derive(Clone)]
pub(crate) struct RingSender(Arc<Mutex<SlotState>>);

impl std::fmt::Debug for RingSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingSender")
    }
}

impl RingSender {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let mut slot = self.0.lock();
        if !slot.open || slot.replied {
            return Err(io::Error::other("ring entry no longer awaits this reply"));
        }
        slot.buffers.write_reply(data)?;
        slot.replied = true;
        Ok(())
    }
}

/// The SQE for `cmd_op` on this entry (`fuse_uring_cmd_req` in the command
/// area: flags, commit_id, qid).
fn command(fd: i32, cmd_op: u32, qid: u16, commit_id: u64, iov: *const libc::iovec) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let entry = opcode::UringCmd80::new(types::Fd(fd), cmd_op)
        .cmd(cmd)
        .addr((cmd_op == FUSE_IO_URING_CMD_REGISTER).then_some(iov as u64))
        .build();
    if cmd_op != FUSE_IO_URING_CMD_REGISTER {
        return entry;
    }
    // REGISTER passes two iovecs (header, payload) as addr and len; the
    // crate sets no len for uring commands.
    const _: () = assert!(size_of::<squeue::Entry128>() == 128);
    // SAFETY: Entry128 is repr(C): an io_uring_sqe followed by 64 bytes;
    // `len` is the u32 at offset 24 of io_uring_sqe.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(entry) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above; every byte pattern is a valid SQE to construct.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Binds the calling thread to `cpu` if the process may run there (an
/// operator's taskset or cpuset is kept: a queue whose CPU is outside it
/// is served from the CPUs allowed).
fn bind_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; the calls read and write only it.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) != 0
            || cpu >= libc::CPU_SETSIZE as usize
            || !libc::CPU_ISSET(cpu, &allowed)
        {
            return;
        }
        let mut only: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut only);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &only);
    }
}

/// A serving thread: registers one entry in queue `qid` and serves the
/// requests the kernel puts in it until the connection ends. A failure to
/// set up goes to `ready` (the session then ends) and returns `Ok`; an error
/// after that is returned.
pub(crate) fn serve<FS: Filesystem>(
    event_loop: &SessionEventLoop<FS>,
    qid: u16,
    payload_len: usize,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    bind_to(qid as usize);
    let fd = event_loop.ch.as_fd().as_raw_fd();
    let setup = || -> io::Result<(IoUring<squeue::Entry128, cqueue::Entry>, RingSender)> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(2)?;
        let slot = RingSender(Arc::new(Mutex::new(SlotState {
            buffers: Buffers::new(payload_len)?,
            open: false,
            replied: false,
        })));
        Ok((ring, slot))
    };
    let (mut ring, slot) = match setup() {
        Ok(parts) => parts,
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    let iov = {
        let state = slot.0.lock();
        [
            libc::iovec {
                iov_base: state.buffers.header.cast(),
                iov_len: HEADER_SIZE,
            },
            libc::iovec {
                iov_base: state.buffers.payload.cast(),
                iov_len: state.buffers.payload_len,
            },
        ]
    };
    // Register. An accepted registration completes only when a request
    // arrives; a refused one completes with its error, and the kernel then
    // goes on with /dev/fuse.
    let register = command(fd, FUSE_IO_URING_CMD_REGISTER, qid, 0, iov.as_ptr());
    // SAFETY: the SQE's iovecs and buffers outlive the ring (dropped
    // first, at the end of this function).
    let submitted = unsafe { ring.submission().push(&register) }
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|()| ring.submit().map(drop));
    if let Err(e) = submitted {
        let _ = ready.send(Err(e));
        return Ok(());
    }
    let _ = ready.send(Ok(()));
    drop(ready);
    let mut served = false;
    // The request as fuser parses it: in header, operation header, payload.
    let mut request = Vec::with_capacity(IN_HEADER_SIZE + OP_IN_SIZE + 4096);
    let result = loop {
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        let Some(cqe) = ring.completion().next() else {
            continue;
        };
        match cqe.result() {
            0 => {}
            // ENOTCONN: unmounted (or the daemon is ending); the classic
            // threads end the session.
            e if e == -libc::ENOTCONN || e == -libc::ECANCELED => break Ok(()),
            e if !served => {
                warn!(
                    "FUSE over io_uring: queue {qid} refused ({}); requests go through /dev/fuse",
                    io::Error::from_raw_os_error(-e)
                );
                break Ok(());
            }
            e => break Err(io::Error::from_raw_os_error(-e)),
        }
        served = true;
        let (unique, commit_id) = {
            let mut state = slot.0.lock();
            state.open = true;
            state.replied = false;
            let buffers = &state.buffers;
            let payload_sz = buffers.read_u32(PAYLOAD_SZ) as usize;
            let commit_id = buffers.read_u64(COMMIT_ID);
            let len = buffers.read_u32(IN_OUT) as usize;
            let unique = buffers.read_u64(IN_OUT + 8);
            // The operation header's size is what the request's length
            // leaves after the in header and the payload.
            let op_len = len
                .checked_sub(IN_HEADER_SIZE + payload_sz)
                .filter(|&op_len| op_len <= OP_IN_SIZE && payload_sz <= buffers.payload_len);
            request.clear();
            if let Some(op_len) = op_len {
                let header = buffers.header();
                request.extend_from_slice(&header[IN_OUT..IN_OUT + IN_HEADER_SIZE]);
                request.extend_from_slice(&header[OP_IN..OP_IN + op_len]);
                request.extend_from_slice(&buffers.payload()[..payload_sz]);
            } else {
                error!("io_uring request {unique}: length {len} with payload {payload_sz}");
                state.buffers.write_error(unique, libc::EIO);
                state.open = false;
            }
            (unique, commit_id)
        };
        if !request.is_empty() {
            match RequestWithSender::with_sender(ReplySender::Ring(slot.clone()), &request) {
                Some(req) => req.dispatch(event_loop),
                None => warn!("io_uring request {unique} could not be parsed"),
            }
            let mut state = slot.0.lock();
            if !state.replied {
                // Dispatch always replies for the requests a ring carries;
                // this keeps the entry alive if it ever does not.
                debug!("io_uring request {unique}: no reply, answering EIO");
                state.buffers.write_error(unique, libc::EIO);
            }
            state.open = false;
        }
        let commit = command(fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, qid, commit_id, iov.as_ptr());
        // SAFETY: as for the registration.
        if let Err(e) = unsafe { ring.submission().push(&commit) } {
            break Err(io::Error::other(e.to_string()));
        }
    };
    drop(ring);
    result
}

//! FUSE over io_uring (Linux 6.14+, `fuse.enable_uring=1`).
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
//! `fuse_uring_cmd_req`, mirrored in `ll::fuse_abi`) and `fs/fuse/dev_uring.c`;
//! libfuse's `lib/fuse_uring.c` is the reference user.

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
use zerocopy::FromBytes;
use zerocopy::IntoBytes;

use crate::Filesystem;
use crate::ll::fuse_abi::FUSE_IO_URING_CMD_COMMIT_AND_FETCH;
use crate::ll::fuse_abi::FUSE_IO_URING_CMD_REGISTER;
use crate::ll::fuse_abi::FUSE_URING_OP_IN_OUT_SZ;
use crate::ll::fuse_abi::consts::FUSE_MIN_READ_BUFFER;
use crate::ll::fuse_abi::fuse_in_header;
use crate::ll::fuse_abi::fuse_out_header;
use crate::ll::fuse_abi::fuse_uring_cmd_req;
use crate::ll::fuse_abi::fuse_uring_req_header;
use crate::reply::ReplySender;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;

const HEADER_SIZE: usize = size_of::<fuse_uring_req_header>();
const IN_HEADER_SIZE: usize = size_of::<fuse_in_header>();
const OUT_HEADER_SIZE: usize = size_of::<fuse_out_header>();

/// `IORING_OP_URING_CMD` (include/uapi/linux/io_uring.h).
const IORING_OP_URING_CMD: u8 = 46;

/// `struct io_uring_sqe` (include/uapi/linux/io_uring.h) as a 128-byte SQE of
/// `IORING_OP_URING_CMD` has it: the fields up to `cmd`, then the 80 bytes of
/// command data. The `io-uring` crate builds the SQE but sets no `len` for
/// uring commands, which REGISTER needs (its iovec count); this is how that
/// field is reached.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct io_uring_sqe_cmd80 {
    opcode: u8,
    flags: u8,
    ioprio: u16,
    fd: i32,
    cmd_op: u32,
    __pad1: u32,
    addr: u64,
    len: u32,
    uring_cmd_flags: u32,
    user_data: u64,
    buf_index: u16,
    personality: u16,
    file_index: u32,
    cmd: [u8; 80],
}

const _: () = assert!(size_of::<io_uring_sqe_cmd80>() == size_of::<squeue::Entry128>());
const _: () = assert!(align_of::<io_uring_sqe_cmd80>() == align_of::<squeue::Entry128>());

/// The payload buffer an entry needs: the kernel refuses to register one
/// smaller than its largest request or reply, which is what it computes here
/// (`fuse_uring_create`, `max_payload_sz`).
pub(crate) fn payload_size(max_write: u32, max_pages: u16, page_size: usize) -> usize {
    FUSE_MIN_READ_BUFFER
        .max(max_write as usize)
        .max(max_pages as usize * page_size)
}

/// Serving threads per CPU queue: a request that takes long holds one; the
/// other serves the rest of that CPU.
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

/// The CPUs of a kernel CPU list such as "0-3,8" (as in
/// /sys/devices/system/cpu/possible), or None if it is not one.
fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for range in text.trim().split(',') {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let first: usize = first.parse().ok()?;
        let last: usize = last.parse().ok()?;
        if last < first || cpus.last().is_some_and(|&prev| prev >= first) {
            return None;
        }
        cpus.extend(first..=last);
    }
    Some(cpus)
}

/// The CPUs of the kernel CPU list in `path`.
fn cpu_list(path: &str) -> io::Result<Vec<usize>> {
    let text = std::fs::read_to_string(path)?;
    parse_cpu_list(&text)
        .ok_or_else(|| io::Error::other(format!("{path}: unexpected CPU list {text:?}")))
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
    header: *mut fuse_uring_req_header,
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
            // A page-aligned mapping of at least HEADER_SIZE bytes.
            header: header.cast(),
            payload,
            payload_len,
        })
    }

    fn header(&self) -> &fuse_uring_req_header {
        // SAFETY: mapped, aligned and large enough (`new`); any bytes are a
        // valid header; see `Send` for the ordering of accesses.
        unsafe { &*self.header }
    }

    fn payload(&self) -> &[u8] {
        // SAFETY: mapped with payload_len bytes; see `Send`.
        unsafe { std::slice::from_raw_parts(self.payload, self.payload_len) }
    }

    /// Both buffers, writable: two separate mappings.
    fn parts_mut(&mut self) -> (&mut fuse_uring_req_header, &mut [u8]) {
        // SAFETY: as above; `&mut self` makes these the only references.
        unsafe {
            (
                &mut *self.header,
                std::slice::from_raw_parts_mut(self.payload, self.payload_len),
            )
        }
    }
}

/// The request in an entry that the kernel filled, joined into the layout
/// fuser parses (the in header, the operation's header, the payload) in
/// `request`; false, with `request` empty, if the lengths the kernel gave do
/// not fit together.
///
/// The kernel splits a request into `in_out` (the in header), `op_in` (the
/// operation's first argument, if it has a fixed-size header) and the
/// payload (`payload_sz` bytes of the rest); the in header's `len` still
/// counts all of it, so the operation header's length is what `len` leaves.
fn read_request(header: &fuse_uring_req_header, payload: &[u8], request: &mut Vec<u8>) -> bool {
    request.clear();
    let Ok((in_header, _)) = fuse_in_header::read_from_prefix(&header.in_out[..]) else {
        return false;
    };
    let len = in_header.len as usize;
    let payload_sz = header.ring_ent_in_out.payload_sz as usize;
    let Some(op_len) = len
        .checked_sub(IN_HEADER_SIZE)
        .and_then(|rest| rest.checked_sub(payload_sz))
        .filter(|&op_len| op_len <= FUSE_URING_OP_IN_OUT_SZ && payload_sz <= payload.len())
    else {
        return false;
    };
    request.extend_from_slice(&header.in_out[..IN_HEADER_SIZE]);
    request.extend_from_slice(&header.op_in[..op_len]);
    request.extend_from_slice(&payload[..payload_sz]);
    true
}

/// The `unique` of the request in an entry.
fn request_unique(header: &fuse_uring_req_header) -> u64 {
    fuse_in_header::read_from_prefix(&header.in_out[..])
        .map(|(in_header, _)| in_header.unique)
        .unwrap_or(0)
}

/// Writes a reply given as fuser's iovecs into an entry: its first
/// `fuse_out_header` bytes go to `in_out`, the rest to the payload, and
/// `payload_sz` says how much of it. A reply that does not fit leaves the
/// entry as it was.
fn write_reply(
    header: &mut fuse_uring_req_header,
    payload: &mut [u8],
    data: &[IoSlice<'_>],
) -> io::Result<()> {
    let total: usize = data.iter().map(|d| d.len()).sum();
    let Some(payload_len) = total.checked_sub(OUT_HEADER_SIZE) else {
        return Err(io::Error::other("reply shorter than its header"));
    };
    if payload_len > payload.len() {
        return Err(io::Error::other(format!(
            "reply of {payload_len} bytes exceeds the ring's {}",
            payload.len()
        )));
    }
    let mut at = 0;
    for slice in data {
        let bytes: &[u8] = slice;
        // The first OUT_HEADER_SIZE bytes of the reply are its header.
        let head = OUT_HEADER_SIZE.saturating_sub(at).min(bytes.len());
        if head > 0 {
            header.in_out[at..at + head].copy_from_slice(&bytes[..head]);
        }
        if head < bytes.len() {
            let dest = at + head - OUT_HEADER_SIZE;
            payload[dest..dest + bytes.len() - head].copy_from_slice(&bytes[head..]);
        }
        at += bytes.len();
    }
    header.ring_ent_in_out.payload_sz = payload_len as u32;
    Ok(())
}

/// Writes an error reply for `unique` into an entry (when the filesystem
/// sent none, or the request could not be read).
fn write_error(header: &mut fuse_uring_req_header, unique: u64, errno: i32) {
    let out = fuse_out_header {
        len: OUT_HEADER_SIZE as u32,
        error: -errno,
        unique,
    };
    header.in_out[..OUT_HEADER_SIZE].copy_from_slice(out.as_bytes());
    header.ring_ent_in_out.payload_sz = 0;
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
        let (header, payload) = slot.buffers.parts_mut();
        write_reply(header, payload, data)?;
        slot.replied = true;
        Ok(())
    }
}

/// The SQE for `cmd_op` on an entry of queue `qid`: REGISTER passes the
/// entry's two iovecs (header, payload) at `iov`; COMMIT_AND_FETCH the
/// `commit_id` the kernel gave with the request.
fn command(
    fd: i32,
    cmd_op: u32,
    qid: u16,
    commit_id: u64,
    iov: *const libc::iovec,
) -> squeue::Entry128 {
    let req = fuse_uring_cmd_req {
        commit_id,
        qid,
        ..Default::default()
    };
    let mut cmd = [0u8; 80];
    cmd[..size_of::<fuse_uring_cmd_req>()].copy_from_slice(req.as_bytes());
    let register = cmd_op == FUSE_IO_URING_CMD_REGISTER;
    let entry = opcode::UringCmd80::new(types::Fd(fd), cmd_op)
        .cmd(cmd)
        .addr(register.then_some(iov as u64))
        .build();
    if !register {
        return entry;
    }
    // SAFETY: Entry128 is repr(C), an io_uring_sqe followed by 64 bytes, which
    // is what `io_uring_sqe_cmd80` lays out (same size and alignment, checked
    // above); every byte pattern is valid for both.
    let mut sqe: io_uring_sqe_cmd80 = unsafe { std::mem::transmute(entry) };
    sqe.len = 2;
    // SAFETY: as above.
    unsafe { std::mem::transmute::<io_uring_sqe_cmd80, squeue::Entry128>(sqe) }
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
    let mut request = Vec::with_capacity(IN_HEADER_SIZE + FUSE_URING_OP_IN_OUT_SZ + 4096);
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
            let header = state.buffers.header();
            let unique = request_unique(header);
            let commit_id = header.ring_ent_in_out.commit_id;
            if !read_request(header, state.buffers.payload(), &mut request) {
                error!(
                    "io_uring request {unique}: length {} with payload {}",
                    fuse_in_header::read_from_prefix(&header.in_out[..]).map_or(0, |(h, _)| h.len),
                    header.ring_ent_in_out.payload_sz
                );
                write_error(state.buffers.parts_mut().0, unique, libc::EIO);
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
                write_error(state.buffers.parts_mut().0, unique, libc::EIO);
            }
            state.open = false;
        }
        let commit = command(
            fd,
            FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
            qid,
            commit_id,
            iov.as_ptr(),
        );
        // SAFETY: as for the registration.
        if let Err(e) = unsafe { ring.submission().push(&commit) } {
            break Err(io::Error::other(e.to_string()));
        }
    };
    drop(ring);
    result
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;
    use std::mem::offset_of;

    use zerocopy::FromZeros;
    use zerocopy::IntoBytes;

    use super::*;
    use crate::ll::AnyRequest;
    use crate::ll::Operation;
    use crate::ll::fuse_abi::fuse_opcode;

    /// An entry as the kernel fills it: `in_header`'s `len` is set here from
    /// the parts, as the kernel's is.
    fn entry(
        opcode: u32,
        unique: u64,
        op: &[u8],
        payload: &[u8],
    ) -> (Box<fuse_uring_req_header>, Vec<u8>) {
        let mut header = Box::new(fuse_uring_req_header::new_zeroed());
        let len = (IN_HEADER_SIZE + op.len() + payload.len()) as u32;
        let in_header: [u32; 10] = [
            len,
            opcode,
            unique as u32,
            (unique >> 32) as u32,
            7,
            0,
            1000,
            1000,
            42,
            0,
        ];
        let in_header: Vec<u8> = in_header.iter().flat_map(|w| w.to_ne_bytes()).collect();
        header.in_out[..IN_HEADER_SIZE].copy_from_slice(&in_header);
        header.op_in[..op.len()].copy_from_slice(op);
        header.ring_ent_in_out.payload_sz = payload.len() as u32;
        header.ring_ent_in_out.commit_id = 99;
        let mut buffer = vec![0xee; 4096];
        buffer[..payload.len()].copy_from_slice(payload);
        (header, buffer)
    }

    /// `fuse_write_in` for `size` bytes at `offset` of file handle 3.
    fn write_in(offset: u64, size: u32) -> Vec<u8> {
        let mut op = Vec::new();
        op.extend_from_slice(&3u64.to_ne_bytes()); // fh
        op.extend_from_slice(&offset.to_ne_bytes());
        op.extend_from_slice(&size.to_ne_bytes());
        op.extend_from_slice(&0u32.to_ne_bytes()); // write_flags
        op.extend_from_slice(&0u64.to_ne_bytes()); // lock_owner
        op.extend_from_slice(&0u32.to_ne_bytes()); // flags
        op.extend_from_slice(&0u32.to_ne_bytes()); // padding
        assert_eq!(op.len(), 40);
        op
    }

    /// The request bytes, 8-aligned as fuser's parser needs them.
    fn aligned(bytes: &[u8]) -> Vec<u64> {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        words.as_mut_bytes()[..bytes.len()].copy_from_slice(bytes);
        words
    }

    #[test]
    fn a_write_is_joined_into_what_fuser_parses() {
        let data = b"hello, ring";
        let (header, payload) = entry(
            fuse_opcode::FUSE_WRITE as u32,
            0x1234_5678_9abc,
            &write_in(4096, data.len() as u32),
            data,
        );
        let mut request = Vec::new();
        assert!(read_request(&header, &payload, &mut request));
        assert_eq!(request.len(), IN_HEADER_SIZE + 40 + data.len());
        assert_eq!(request_unique(&header), 0x1234_5678_9abc);
        let words = aligned(&request);
        let bytes = &words.as_bytes()[..request.len()];
        let parsed = AnyRequest::try_from(bytes).unwrap();
        assert_eq!(parsed.unique().0, 0x1234_5678_9abc);
        let Ok(Operation::Write(write)) = parsed.operation() else {
            panic!("not parsed as a write: {parsed}");
        };
        assert_eq!(write.offset().unwrap(), 4096);
        assert_eq!(write.data(), data);
    }

    #[test]
    fn a_request_without_payload_or_op_header() {
        // STATFS has neither an operation header nor a payload.
        let (header, payload) = entry(fuse_opcode::FUSE_STATFS as u32, 5, &[], &[]);
        let mut request = vec![1, 2, 3];
        assert!(read_request(&header, &payload, &mut request));
        assert_eq!(request, header.in_out[..IN_HEADER_SIZE]);
    }

    #[test]
    fn inconsistent_lengths_are_refused() {
        let op = write_in(0, 4);
        let (mut header, payload) = entry(fuse_opcode::FUSE_WRITE as u32, 1, &op, b"abcd");
        let mut request = Vec::new();

        // A payload larger than `len` leaves.
        header.ring_ent_in_out.payload_sz = 100;
        assert!(!read_request(&header, &payload, &mut request));
        assert!(request.is_empty());

        // A payload larger than the buffer.
        header.ring_ent_in_out.payload_sz = 5000;
        header.in_out[..4].copy_from_slice(&(IN_HEADER_SIZE as u32 + 5000).to_ne_bytes());
        assert!(!read_request(&header, &payload, &mut request));

        // An operation header larger than op_in.
        header.ring_ent_in_out.payload_sz = 0;
        header.in_out[..4].copy_from_slice(&(IN_HEADER_SIZE as u32 + 129).to_ne_bytes());
        assert!(!read_request(&header, &payload, &mut request));
        header.in_out[..4].copy_from_slice(&(IN_HEADER_SIZE as u32 + 128).to_ne_bytes());
        assert!(read_request(&header, &payload, &mut request));
        assert_eq!(request.len(), IN_HEADER_SIZE + 128);

        // A length shorter than the in header.
        header.in_out[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(!read_request(&header, &payload, &mut request));
        assert!(request.is_empty());
    }

    fn out_header(header: &fuse_uring_req_header) -> (u32, i32, u64) {
        let word = |at: usize| u32::from_ne_bytes(header.in_out[at..at + 4].try_into().unwrap());
        let unique = u64::from_ne_bytes(header.in_out[8..16].try_into().unwrap());
        (word(0), word(4) as i32, unique)
    }

    #[test]
    fn a_reply_is_split_into_header_and_payload() {
        let (mut header, mut payload) = entry(fuse_opcode::FUSE_READ as u32, 7, &[], &[]);
        let out: Vec<u8> = [28u32, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .chain(7u64.to_ne_bytes())
            .collect();
        let body = b"0123456789ab";
        // The header itself split across iovecs, and an iovec that holds its
        // end and the payload's start.
        let mut second = out[10..].to_vec();
        second.extend_from_slice(&body[..5]);
        let data = [
            IoSlice::new(&out[..10]),
            IoSlice::new(&second),
            IoSlice::new(&[]),
            IoSlice::new(&body[5..]),
        ];
        write_reply(&mut header, &mut payload, &data).unwrap();
        assert_eq!(out_header(&header), (28, 0, 7));
        assert_eq!(&payload[..body.len()], body);
        assert_eq!(payload[body.len()], 0xee, "wrote past the reply");
        assert_eq!(header.ring_ent_in_out.payload_sz, body.len() as u32);
        // The request's other fields are left for the kernel to ignore.
        assert_eq!(header.ring_ent_in_out.commit_id, 99);
    }

    #[test]
    fn replies_that_do_not_fit_leave_the_entry_alone() {
        let (mut header, mut payload) = entry(fuse_opcode::FUSE_READ as u32, 7, &[], b"xyz");
        let before = (*header, payload.clone());
        let short = [0u8; 15];
        assert!(write_reply(&mut header, &mut payload, &[IoSlice::new(&short)]).is_err());
        let long = vec![0u8; OUT_HEADER_SIZE + 4097];
        assert!(write_reply(&mut header, &mut payload, &[IoSlice::new(&long)]).is_err());
        assert_eq!(header.as_bytes(), before.0.as_bytes());
        assert_eq!(payload, before.1);
        // Exactly as large as the buffer fits.
        let full = vec![1u8; OUT_HEADER_SIZE + 4096];
        write_reply(&mut header, &mut payload, &[IoSlice::new(&full)]).unwrap();
        assert_eq!(header.ring_ent_in_out.payload_sz, 4096);
    }

    #[test]
    fn an_error_reply() {
        let (mut header, _) = entry(fuse_opcode::FUSE_READ as u32, 7, &[], b"xyz");
        write_error(&mut header, 0xfeed, libc::EIO);
        assert_eq!(out_header(&header), (16, -libc::EIO, 0xfeed));
        assert_eq!(header.ring_ent_in_out.payload_sz, 0);
    }

    #[test]
    fn a_sender_replies_once_and_only_while_its_entry_is_open() {
        let sender = RingSender(Arc::new(Mutex::new(SlotState {
            buffers: Buffers::new(8192).unwrap(),
            open: false,
            replied: false,
        })));
        let reply = [0u8; 20];
        // Not yet handed a request (or already committed).
        assert!(sender.send(&[IoSlice::new(&reply)]).is_err());
        sender.0.lock().open = true;
        sender.send(&[IoSlice::new(&reply)]).unwrap();
        assert_eq!(
            sender.0.lock().buffers.header().ring_ent_in_out.payload_sz,
            4
        );
        // A second reply to the same request.
        assert!(sender.clone().send(&[IoSlice::new(&reply)]).is_err());
    }

    /// The SQE as the kernel reads it.
    fn sqe(entry: squeue::Entry128) -> io_uring_sqe_cmd80 {
        // SAFETY: see `command`.
        unsafe { std::mem::transmute(entry) }
    }

    #[test]
    fn io_uring_sqe_layout() {
        // include/uapi/linux/io_uring.h
        assert_eq!(size_of::<io_uring_sqe_cmd80>(), 128);
        assert_eq!(offset_of!(io_uring_sqe_cmd80, opcode), 0);
        assert_eq!(offset_of!(io_uring_sqe_cmd80, fd), 4);
        assert_eq!(offset_of!(io_uring_sqe_cmd80, cmd_op), 8);
        assert_eq!(offset_of!(io_uring_sqe_cmd80, addr), 16);
        assert_eq!(offset_of!(io_uring_sqe_cmd80, len), 24);
        assert_eq!(offset_of!(io_uring_sqe_cmd80, user_data), 32);
        assert_eq!(offset_of!(io_uring_sqe_cmd80, file_index), 44);
        assert_eq!(offset_of!(io_uring_sqe_cmd80, cmd), 48);
    }

    #[test]
    fn register_command() {
        let iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let raw = sqe(command(9, FUSE_IO_URING_CMD_REGISTER, 3, 0, iov.as_ptr()));
        assert_eq!(raw.opcode, IORING_OP_URING_CMD);
        assert_eq!(raw.fd, 9);
        assert_eq!(raw.cmd_op, FUSE_IO_URING_CMD_REGISTER);
        assert_eq!(raw.addr, iov.as_ptr() as u64);
        assert_eq!(raw.len, 2, "REGISTER carries two iovecs");
        let (req, rest) = fuse_uring_cmd_req::read_from_prefix(&raw.cmd[..]).unwrap();
        assert_eq!((req.flags, req.commit_id, req.qid), (0, 0, 3));
        assert!(rest.iter().all(|&b| b == 0));
    }

    #[test]
    fn commit_and_fetch_command() {
        let raw = sqe(command(
            9,
            FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
            1,
            0xdead_beef_0042,
            std::ptr::null(),
        ));
        assert_eq!(raw.opcode, IORING_OP_URING_CMD);
        assert_eq!(raw.cmd_op, FUSE_IO_URING_CMD_COMMIT_AND_FETCH);
        assert_eq!((raw.addr, raw.len), (0, 0));
        let (req, _) = fuse_uring_cmd_req::read_from_prefix(&raw.cmd[..]).unwrap();
        assert_eq!((req.commit_id, req.qid), (0xdead_beef_0042, 1));
    }

    #[test]
    fn payload_sizing() {
        // The kernel's minimum read buffer, for small settings.
        assert_eq!(payload_size(4096, 1, 4096), 8192);
        // max_write when it is the largest.
        assert_eq!(payload_size(1 << 20, 16, 4096), 1 << 20);
        // max_pages (from max_readahead) when it is.
        assert_eq!(payload_size(65536, 32, 4096), 131072);
        assert_eq!(payload_size(65536, 32, 16384), 524288);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(parse_cpu_list("0-3\n"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse_cpu_list("0-2,5,7-8\n"), Some(vec![0, 1, 2, 5, 7, 8]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("0-3,2"), None);
        assert_eq!(parse_cpu_list("0,,1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn the_possible_cpus_give_the_queue_count() {
        // Not a kernel's FUSE: only sysfs, which every Linux test machine has.
        let queues = queue_count().unwrap();
        assert!(queues >= 1);
        assert!(queues >= std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
}

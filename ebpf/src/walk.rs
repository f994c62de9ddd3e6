//! cgmetric's cgroup walk: one `iter/cgroup` program that visits every
//! cgroup of a hierarchy in one pass, run when user space reads the
//! iterator (never from the kernel's own paths), and writes each cgroup's
//! id and the words [`WalkConfig`] names into the `WALKED` array.
//!
//! Nothing is written to the iterator's output but the count at the end:
//! a cgroup iterator holds `cgroup_mutex` for its whole walk and so cannot
//! resume a read, which caps its output at the seq_file buffer (8 pages),
//! some 500 cgroups of records.
//!
//! Every address is a plain number read with `bpf_probe_read_kernel`:
//! aya's Rust programs carry no CO-RE relocations, so the offsets come from
//! the running kernel's BTF at load, and a read that faults leaves its
//! field out of the record rather than the program rejected.

#![no_std]
#![no_main]

use core::ffi::c_void;
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::bindings::{seq_file, BPF_F_MMAPABLE};
use aya_ebpf::helpers::bpf_probe_read_kernel;
use aya_ebpf::helpers::generated::bpf_seq_write;
use aya_ebpf::macros::map;
use aya_ebpf::maps::Array;
use cgmetric_common::walk::{WalkConfig, WalkRecord, FIELDS, UNUSED};

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Set by the loader from the kernel's BTF.
#[unsafe(no_mangle)]
static WALK_CONFIG: WalkConfig = WalkConfig::EMPTY;

/// Sized by the loader; mapped read-only by user space.
#[map]
static WALKED: Array<WalkRecord> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[map]
static WALK_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// `struct bpf_iter_meta`: stable kernel ABI.
#[repr(C)]
pub struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__cgroup`: stable kernel ABI.
#[repr(C)]
pub struct IterCgroup {
    meta: *mut IterMeta,
    cgroup: u64,
}

/// What a cgroup has of a controller: no state, or one without files (its
/// files are absent); a state with files; or a state that could not be read.
const STATE_MISSING: u8 = 0;
const STATE_VISIBLE: u8 = 1;
const STATE_UNREADABLE: u8 = 2;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/cgroup")]
pub fn walk_cgroups(ctx: *mut IterCgroup) -> i32 {
    // SAFETY: the kernel passes a valid context; every kernel address below
    // is only ever read through bpf_probe_read_kernel.
    unsafe { visit(ctx) };
    0
}

unsafe fn visit(ctx: *mut IterCgroup) {
    let Some(count) = WALK_COUNT.get_ptr_mut(0) else {
        return;
    };
    // Read as a number, not as the BTF-typed pointer the verifier would
    // make of a plain load: it is only ever an address to probe-read from.
    let cgroup = unsafe { bpf_probe_read_kernel(addr_of!((*ctx).cgroup)) }.unwrap_or(0);
    if cgroup == 0 {
        // The walk is over: report how many cgroups it visited.
        let meta = unsafe { (*ctx).meta };
        let seq = unsafe { (*meta).seq };
        let visited = unsafe { *count };
        unsafe { bpf_seq_write(seq, addr_of!(visited).cast::<c_void>(), 8) };
        return;
    }
    let index = unsafe { *count };
    unsafe { *count = index + 1 };
    if index > u32::MAX as u64 {
        return;
    }
    let Some(record) = WALKED.get_ptr_mut(index as u32) else {
        return;
    };
    let config = unsafe { read_volatile(addr_of!(WALK_CONFIG)) };
    let word = |address: u64| unsafe { bpf_probe_read_kernel(address as *const u64) }.ok();
    let flags = |address: u64| unsafe { bpf_probe_read_kernel(address as *const u32) }.ok();
    let id = word(cgroup + config.cgroup_kn as u64)
        .and_then(|kn| word(kn + config.kn_id as u64))
        .unwrap_or(0);
    let (mut present, mut missing) = (0u64, 0u64);
    // The last controller state looked up: fields of one controller follow
    // each other, so each state is read once, not once per field.
    let mut cached_subsys = UNUSED;
    let mut cached = (STATE_UNREADABLE, 0u64);
    // Written out, not a loop: before 6.3 the verifier rejects a loop that
    // comes back to the instruction after a call ("back-edge from insn"),
    // and LLVM leaves this one rolled.
    macro_rules! fields {
        ($($i:literal)*) => {$(
            let field = config.fields[$i];
            if field.subsys != UNUSED && field.subsys < config.subsys_count {
                if field.subsys != cached_subsys {
                    cached_subsys = field.subsys;
                    cached = match word(cgroup + config.cgroup_subsys as u64 + 8 * field.subsys as u64) {
                        Some(0) => (STATE_MISSING, 0),
                        Some(state) => match flags(state + config.css_flags as u64) {
                            Some(f) if f & config.css_visible == 0 => (STATE_MISSING, 0),
                            Some(_) => (STATE_VISIBLE, state),
                            None => (STATE_UNREADABLE, 0),
                        },
                        None => (STATE_UNREADABLE, 0),
                    };
                }
                match cached {
                    (STATE_MISSING, _) => missing |= 1 << $i,
                    (STATE_VISIBLE, state) => {
                        if let Some(value) = word(state + field.offset as u64) {
                            unsafe { (*record).values[$i] = value };
                            present |= 1 << $i;
                        }
                    }
                    _ => {}
                }
            }
        )*};
    }
    fields!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24);
    const _: () = assert!(FIELDS == 25, "fields! lists every field");
    unsafe {
        (*record).id = id;
        (*record).present = present;
        (*record).missing = missing;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

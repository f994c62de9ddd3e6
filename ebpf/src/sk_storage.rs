//! A socket-storage map, declared the way libbpf's `.maps` section expects:
//! a struct whose members encode the definition in their types (`type` and
//! `map_flags` as array lengths, `key` and `value` as pointee types). The
//! kernel creates this map type only with BTF for its key and value;
//! bpf-linker turns the debug info into the BTF that aya reads.
//!
//! aya-ebpf 0.2 has a `btf_maps::SkStorage`, but it cannot stand in for
//! this one: its flags are fixed to `BPF_F_NO_PREALLOC`, without the
//! `BPF_F_CLONE` that hands a listener's value to the sockets it accepts
//! (how passive connections are attributed); it reaches a socket only
//! through a `SockAddrContext` (cgroup connect/bind programs), not from
//! cgroup/sock_create or sock_ops; and it cannot be pinned by name, which a
//! restart needs to keep the sockets' records.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::ptr;

use aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SK_STORAGE;
use aya_ebpf::bindings::{BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE};
use aya_ebpf::helpers::generated::bpf_sk_storage_get;

/// Socket storage requires no preallocation; `BPF_F_CLONE` copies a
/// listener's value to the sockets it accepts.
const FLAGS: usize = (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize;
/// libbpf's LIBBPF_PIN_BY_NAME.
const PIN_BY_NAME: usize = 1;

#[repr(C)]
pub struct SkStorage<V> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    map_flags: *const [i32; FLAGS],
    key: *const i32,
    value: *const V,
    pinning: *const [i32; PIN_BY_NAME],
    _value: PhantomData<V>,
}

// SAFETY: the members are never dereferenced; they only carry types.
unsafe impl<V: Sync> Sync for SkStorage<V> {}

impl<V> SkStorage<V> {
    pub const fn new() -> Self {
        SkStorage {
            r#type: ptr::null(),
            map_flags: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            pinning: ptr::null(),
            _value: PhantomData,
        }
    }

    fn lookup(&self, sk: *mut c_void, flags: u64) -> Option<&mut V> {
        let map = self as *const Self as *mut c_void;
        // SAFETY: `map` is this map (the loader relocates it), `sk` a socket
        // the verifier has checked.
        let value = unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), flags) };
        // SAFETY: storage returned by the kernel lives as long as the socket.
        unsafe { value.cast::<V>().as_mut() }
    }

    /// The socket's value, if it has one.
    pub fn get(&self, sk: *mut c_void) -> Option<&mut V> {
        self.lookup(sk, 0)
    }

    /// The socket's value, created zeroed if absent.
    pub fn get_or_create(&self, sk: *mut c_void) -> Option<&mut V> {
        self.lookup(sk, BPF_SK_STORAGE_GET_F_CREATE.into())
    }
}
